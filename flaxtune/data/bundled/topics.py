"""Topic facts for the short-paragraph writing task.

Each topic has an opening sentence and six facts, each fact tagged with the
keyword a prompt can ask for. A reference paragraph is the opening sentence
followed by the requested facts in their listed order, so the prompt fully
determines the reference while the split between train and test is over
unseen (topic, fact subset) combinations.
"""

from __future__ import annotations

TOPICS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "the sea": (
        "The sea covers most of our planet.",
        (
            ("salt", "Its water is full of salt, so people cannot drink it."),
            ("waves", "Wind pushes the water into waves that roll onto the beach."),
            ("fish", "Millions of fish live in the sea and feed many people."),
            ("ships", "Large ships carry goods across the sea from one country to another."),
            ("tides", "Twice a day the tides rise and fall because of the moon."),
            ("storms", "Storms at sea can be dangerous for small boats."),
        ),
    ),
    "coffee": (
        "Coffee is one of the most popular drinks in the world.",
        (
            ("beans", "It is made from roasted beans that grow on small trees."),
            ("morning", "Many people drink a cup every morning to wake up."),
            ("milk", "Some people like it with milk, and others drink it black."),
            ("cafes", "Friends often meet in cafes to talk over a coffee."),
            ("sleep", "Too much coffee late in the day can make it hard to sleep."),
            ("farmers", "Farmers in warm countries grow most of the coffee we drink."),
        ),
    ),
    "bicycles": (
        "A bicycle is a simple and useful machine.",
        (
            ("wheels", "It has two wheels and is moved by pushing the pedals."),
            ("health", "Riding a bicycle is good for your health."),
            ("traffic", "In busy cities a bicycle is often faster than a car in traffic."),
            ("helmet", "Riders should wear a helmet to stay safe."),
            ("fuel", "A bicycle needs no fuel and makes no smoke."),
            ("repair", "Most repairs, like fixing a flat tire, are easy to learn."),
        ),
    ),
    "rain": (
        "Rain is water that falls from the clouds.",
        (
            ("plants", "Plants need rain to grow, and farmers wait for it in spring."),
            ("umbrella", "People carry an umbrella to stay dry on rainy days."),
            ("rivers", "Rain fills the rivers and lakes that give us drinking water."),
            ("sound", "Many people enjoy the sound of rain on the roof at night."),
            ("floods", "Too much rain in a short time can cause floods."),
            ("rainbow", "When the sun comes out after rain, a rainbow may appear."),
        ),
    ),
    "libraries": (
        "A library is a place where anyone can borrow books.",
        (
            ("quiet", "Libraries are quiet, so they are good places to study."),
            ("free", "In most towns, borrowing a book is free."),
            ("librarians", "Librarians help visitors find the books they need."),
            ("computers", "Many libraries also offer computers and internet access."),
            ("children", "Children often come to listen to stories read aloud."),
            ("history", "Some libraries keep very old books about local history."),
        ),
    ),
    "the moon": (
        "The moon is the brightest object in the night sky.",
        (
            ("light", "It does not make its own light but reflects light from the sun."),
            ("phases", "Its shape seems to change every night as it goes through its phases."),
            ("astronauts", "Astronauts first walked on the moon in 1969."),
            ("tides", "Its pull on the oceans causes the tides."),
            ("craters", "Its surface is covered with craters made by falling rocks."),
            ("month", "It takes about a month to travel around the Earth."),
        ),
    ),
    "bread": (
        "Bread is one of the oldest foods that people make.",
        (
            ("flour", "It is baked from flour, water, salt and yeast."),
            ("bakers", "Bakers start work very early to sell fresh bread in the morning."),
            ("oven", "The dough rises before it goes into a hot oven."),
            ("sandwiches", "Slices of bread are used to make sandwiches."),
            ("cultures", "Almost every culture has its own kind of bread."),
            ("smell", "The smell of fresh bread fills the whole kitchen."),
        ),
    ),
    "trains": (
        "Trains carry people and goods over long distances.",
        (
            ("rails", "They run on steel rails that connect towns and cities."),
            ("stations", "Passengers get on and off at busy stations."),
            ("speed", "Modern high speed trains can travel faster than 300 kilometres an hour."),
            ("tickets", "Travellers buy tickets before they board."),
            ("cargo", "Freight trains carry heavy cargo such as coal and grain."),
            ("views", "From the window you can watch fields and mountains go by."),
        ),
    ),
    "gardens": (
        "A garden is a small piece of land where people grow plants.",
        (
            ("flowers", "Many gardens are full of bright flowers in summer."),
            ("vegetables", "Some families grow their own vegetables, like tomatoes and beans."),
            ("water", "Plants in a garden need water on dry days."),
            ("bees", "Bees visit the flowers and help the plants make fruit."),
            ("weeds", "Gardeners pull out weeds so that other plants can grow."),
            ("relax", "Working in a garden helps many people relax."),
        ),
    ),
    "winter": (
        "Winter is the coldest season of the year.",
        (
            ("snow", "In many places snow covers the ground for weeks."),
            ("coats", "People wear warm coats, hats and gloves outside."),
            ("nights", "The days are short and the nights are long."),
            ("skiing", "Some people go skiing or skating on frozen lakes."),
            ("heating", "Homes use more heating to stay warm."),
            ("holidays", "Several important holidays take place in winter."),
        ),
    ),
    "music": (
        "Music is part of every human culture.",
        (
            ("instruments", "People play instruments such as the piano, the guitar and drums."),
            ("singing", "Singing together makes people feel close to each other."),
            ("concerts", "At concerts, large crowds listen to their favourite bands."),
            ("mood", "A song can change our mood in a few seconds."),
            ("lessons", "Many children take music lessons at school."),
            ("dance", "Music with a strong beat makes people want to dance."),
        ),
    ),
    "cats": (
        "Cats are among the most popular pets.",
        (
            ("sleep", "They sleep for up to sixteen hours a day."),
            ("independent", "Cats are independent and can look after themselves."),
            ("mice", "For centuries people kept cats to catch mice."),
            ("purr", "A happy cat often purrs when it is stroked."),
            ("climb", "Cats are good at climbing trees and fences."),
            ("clean", "They spend a lot of time keeping their fur clean."),
        ),
    ),
    "dogs": (
        "Dogs have lived with people for thousands of years.",
        (
            ("loyal", "They are known as loyal friends to their owners."),
            ("walks", "Most dogs need long walks every day."),
            ("work", "Some dogs work with farmers, police or blind people."),
            ("smell", "A dog has a much better sense of smell than a human."),
            ("training", "Young dogs learn simple commands through patient training."),
            ("play", "Dogs love to play with balls and sticks."),
        ),
    ),
    "mountains": (
        "Mountains are high areas of land that rise above their surroundings.",
        (
            ("snow", "The highest peaks are covered with snow all year."),
            ("climbers", "Climbers train for months before they try a difficult summit."),
            ("air", "The air becomes thinner as you go higher."),
            ("rivers", "Many rivers begin as small streams in the mountains."),
            ("animals", "Goats and eagles are well adapted to life on steep slopes."),
            ("hiking", "Hiking in the mountains is a popular summer activity."),
        ),
    ),
    "markets": (
        "A market is a place where people buy and sell goods.",
        (
            ("fresh", "Farmers bring fresh fruit and vegetables to sell."),
            ("prices", "Buyers sometimes talk with sellers about the price."),
            ("weekend", "Many towns hold a market every weekend."),
            ("noise", "Markets are often busy and full of noise and colour."),
            ("local", "Shopping at a market supports local producers."),
            ("food", "Some markets have stalls that sell hot food."),
        ),
    ),
    "tea": (
        "Tea is a drink made by pouring hot water over dried leaves.",
        (
            ("China", "People in China have been drinking tea for thousands of years."),
            ("green", "Green tea and black tea come from the same plant."),
            ("guests", "In many homes, guests are offered a cup of tea."),
            ("calm", "A warm cup of tea can help people feel calm."),
            ("milk", "In Britain, tea is often served with milk."),
            ("hills", "Tea grows best on wet hills in warm regions."),
        ),
    ),
    "computers": (
        "Computers have changed the way people work and live.",
        (
            ("programs", "They follow programs written by people to solve problems."),
            ("internet", "Through the internet, computers share information around the world."),
            ("games", "Many people use computers to play games."),
            ("fast", "A computer can do millions of calculations in a second."),
            ("schools", "Students use computers at school to write and research."),
            ("memory", "Files are kept in memory so they can be opened again later."),
        ),
    ),
    "birds": (
        "Birds are animals with feathers, and most of them can fly.",
        (
            ("nests", "They build nests to lay their eggs."),
            ("songs", "Many birds sing songs, especially early in the morning."),
            ("migrate", "Some birds migrate thousands of kilometres every year."),
            ("wings", "Strong wings and light bones help them fly."),
            ("seeds", "Small birds often eat seeds and insects."),
            ("colours", "Some birds have bright colours to attract a partner."),
        ),
    ),
}
